"""The evaluation room: metrics as pure functions, rank shift, CIRR test-server files. Imports nothing from cirlib.
"""
