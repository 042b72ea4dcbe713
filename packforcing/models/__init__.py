"""packforcing.models"""
