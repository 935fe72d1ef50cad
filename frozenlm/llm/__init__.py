"""frozenlm.llm"""
