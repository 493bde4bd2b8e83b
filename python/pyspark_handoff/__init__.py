"""Makes `handoff` a format every Spark >= 4.0 session knows, with no `register` call.

Spark looks for installed top-level modules named `pyspark_*` that define `DefaultSource`, a
Python `DataSource` subclass, and registers each under its `name()`. That lookup runs on the JVM
side, so Scala, Java and SQL jobs of a Spark with this package in its Python environment can use
`format("handoff")` / `USING handoff` too. Spark imports every such module, so this one must
never fail to import: on Spark 3.5 it defines nothing.
"""

from handoff.spark import HandoffDataSource

if HandoffDataSource is not None:
    DefaultSource = HandoffDataSource
