"""The archive of the change streams: segments in the snapshot store, read only by restores.

``segment`` is the format (pure), ``catalog`` lists and judges what a store holds, ``writer``
keeps the archive on the snapshot leader, ``cut`` decides where a point-in-time restore
(:mod:`harmonylite.restore.point_in_time`) stops, ``verify`` proves an archive continuous.
"""
