"""The web dashboard: static files (plain ES modules and CSS, no build step) and the read views it needs."""
