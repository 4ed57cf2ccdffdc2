"""What operators use: the admin API and its server, metrics, views, the command line."""
