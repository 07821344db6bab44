"""The operator console: a small web app served by the backend (``sealmq backend run --http``).

``feed`` collects what the service reports (and what the broker relays, as the monitor sees it),
``auth`` checks the operator's password, ``app`` builds the Starlette application and its views,
``server`` runs it with uvicorn beside the service. ``static/`` holds the page, its script and the
vendored uPlot chart library: nothing is loaded from elsewhere.
"""
