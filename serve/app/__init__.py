"""The Ray Serve application: Directory, Worker and Ingress deployments, the request router and the
app builder (`serve.app.builder:build_app`). Import the submodules you need; nothing starts on import.
"""
