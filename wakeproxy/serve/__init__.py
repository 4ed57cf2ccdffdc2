"""Services at run time: each service's glue carrying out the core's decisions,
replicas' pools, runtime operations, prediction, label discovery."""
