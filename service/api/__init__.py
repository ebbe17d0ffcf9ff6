"""The HTTP API: ``create_app`` in :mod:`service.api.main`, dependencies in ``deps``, routes by resource."""
