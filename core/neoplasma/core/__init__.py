"""core/neoplasma/core"""
