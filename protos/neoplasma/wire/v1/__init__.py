"""protos/neoplasma/wire/v1"""
