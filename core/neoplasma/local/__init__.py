"""core/neoplasma/local"""
