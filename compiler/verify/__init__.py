"""verify"""
from flowc.compiler.verify.verifier import *  # noqa: F401,F403
