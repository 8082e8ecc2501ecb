"""The schedule language: grammar, parser to AST, printer, resolver to a Pipeline."""
