"""protos/neoplasma/wire"""
