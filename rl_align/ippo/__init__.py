"""ippo"""
