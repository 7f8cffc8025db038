"""dmrepl: continuous-checkpoint block replication on Linux device-mapper.

Layers (each imports only from the ones below it):
  dmrepl.kernel   -- kernel interfaces: DM ioctls, loop, block devices, table values
  (policy)        -- secondary, primary, checkpoint, failover, resync (later issues)
  dmrepl.cli      -- command line and daemon
"""

__version__ = "0.1.0"
