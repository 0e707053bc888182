"""The approval pages under ``/ui`` (``ui.enabled``): server-rendered, no third-party assets.

Modules: ``component`` (the serve component; public), ``routes`` (pages and forms), ``session``
(login sessions, CSRF, same-origin checks), ``views`` (what the pages show), ``templates/`` and
``static/`` (package data: Jinja2 templates, one stylesheet, one small script).
"""
