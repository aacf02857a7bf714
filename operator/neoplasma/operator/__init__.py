"""operator/neoplasma/operator"""
