"""(checkers to come)"""
