"""The composition root: the command line, `optimize` (a whole run), its report and console
output. Imports anything in iropt; nothing in iropt imports it.
"""
