"""Ray Serve hosting of exported generators (``app.build_app``). Imports ray; layers 1-4 never import this."""
