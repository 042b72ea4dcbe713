"""packforcing.compressors"""
