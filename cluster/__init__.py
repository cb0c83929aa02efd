"""postroom cluster: everything that talks to etcd or to other nodes."""
