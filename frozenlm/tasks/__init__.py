"""frozenlm.tasks"""
