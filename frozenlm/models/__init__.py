"""frozenlm.models"""
