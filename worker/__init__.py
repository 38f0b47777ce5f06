"""AfterTrip Faces pipeline core: photo bytes in, person groups out.

This package imports no Celery, SQLAlchemy or boto3: everything the product does to a
photo can be run and tested here alone.
"""

__version__ = "0.1.0"
