"""The gRPC transport (lmserve.v1): conversion.py (messages <-> neutral inputs and presented outputs), rpcs.py
(each RPC), server.py (the wrapper every RPC shares, health, reflection, the server)."""
