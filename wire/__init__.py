"""Records every floor may use: the typed requests of the libnetwork wire and the error tree with HTTP statuses."""
