"""The process around the work: devices, host memory, locks, worker processes, files written whole, where a
command may write, argument values, optional packages."""
