"""`picstream-admin`: operator commands over the same settings as the web and workers."""
