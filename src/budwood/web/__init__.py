"""The service's dashboard: server-rendered pages over the same queue and registry the API uses."""
