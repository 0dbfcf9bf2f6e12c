"""The meshgate key service: signs node keys, issues pre-shared keys and
external client key pairs, rotates them, and runs the internal CA.

This is its first slice: the server process and the API surface. Every method
answers UNIMPLEMENTED with a message saying so, until the key lifecycle lands.
"""
