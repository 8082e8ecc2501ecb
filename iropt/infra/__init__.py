"""Pass infrastructure: the pass base, options, registry, pipeline, pass manager, instruments
(verify-each and bisection) and the back-end interface. Imports: iropt.verify and below.
"""
