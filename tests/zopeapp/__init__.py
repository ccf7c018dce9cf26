"""A tiny Zope package for test_zope.py: views that send mail.

runwsgi imports it with tests/ on $PYTHONPATH; etc/package-includes
includes its configure.zcml.
"""
