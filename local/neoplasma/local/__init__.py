"""local/neoplasma/local"""
