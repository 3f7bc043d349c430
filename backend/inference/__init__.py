"""Serving what was trained: the embedded engine (`safetrain serve`) and the client the API proxies through.

Import the modules, not this package: `engine` and `server` load torch; `protocol`, `client` and `served_models`
do not, so the API imports them cheaply.
"""
