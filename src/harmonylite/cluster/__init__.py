"""The cluster as a whole: each node's heartbeat, and the view ``cluster status`` and the live
page build from them."""
