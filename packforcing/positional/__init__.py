"""packforcing.positional"""
