"""packforcing.policies"""
