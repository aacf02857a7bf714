"""protos/neoplasma/plasma"""
