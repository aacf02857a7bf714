"""proxy/neoplasma/proxy"""
