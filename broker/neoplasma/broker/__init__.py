"""broker/neoplasma/broker"""
