"""Storage below everything that reads or writes runs, data and models: S3 through boto3
(``s3``) and atomic local writes with local-or-S3 paths (``local``)."""
