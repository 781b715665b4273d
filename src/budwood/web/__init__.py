"""The service's dashboard: server-rendered pages over the same queue and registry the API uses.

dashboard.py has the routes, serving.py the `Dashboard` serving object (sign-in, templates, what each
page reads), views.py what the pages show as pure functions; templates/ and static/ the rest.
"""
