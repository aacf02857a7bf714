"""protos/neoplasma/plasma/v1"""
