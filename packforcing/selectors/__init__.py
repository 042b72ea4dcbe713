"""packforcing.selectors"""
