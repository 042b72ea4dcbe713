"""packforcing.core"""
