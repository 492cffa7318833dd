"""Serving: the socket server, the scheduler (queue, groups, batches), model reload and the
daemon's main. The one room that knows both the wire (`..rpc`) and the engine (`..engine`)."""
