"""What passes read and edit: Model, graph helpers, fresh names, shapes, constants, node
evaluation, weight channel layout. Imports: iropt.errors and iropt.util only.
"""
