"""Reading and writing models: validated loads, atomic saves, the streaming writer and
external data. Imports: iropt.ir, iropt.util, iropt.errors.
"""
