"""The FICTIONAL demo consortium: three hospitals' notes, a public split and
canaries (data), built from invented phrase banks (text). Teaching material
for the demo and the tests; no hospital runs this.
"""
