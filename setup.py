from setuptools import find_packages, setup

setup(
    name='mailout',
    version='0.1.0.dev0',
    description='Transactional, queued, per-process configured mail-out '
                'service for Zope / ZCA applications',
    long_description=open('README.rst').read() + '\n\n' + open('CHANGES.rst').read(),
    long_description_content_type='text/x-rst',
    license='ZPL-2.1',
    packages=find_packages('src'),
    package_dir={'': 'src'},
    package_data={'mailout': ['*.xml', '*.zcml', 'py.typed']},
    python_requires='>=3.9',
    install_requires=[
        'setuptools',
        'transaction >= 3.0',
        'prometheus_client',
        'ZConfig >= 3.6',
        'zope.component',
        'zope.configuration',
        'zope.event',
        'zope.interface',
        'zope.processlifetime',
        'zope.sendmail >= 6.0',
    ],
    extras_require={
        'demo': ['aiosmtpd'],
        'mailhost': ['Products.MailHost'],  # <mail:mailhost/>
        'test': [
            'aiosmtpd',
            'hypothesis',
            'Paste',            # the translogger in mkwsgiinstance's zope.ini
            'Products.MailHost',  # tests/test_mailhost.py
            'pytest',
            'trustme',
            'Zope',             # tests/test_zope.py runs a real instance
            'zope.testing',
            'zope.testrunner',
        ],
    },
    entry_points={
        'console_scripts': ['mailout = mailout.cli:main'],
    },
    classifiers=[
        'Framework :: Zope',
        'Framework :: Zope :: 6',
        'Programming Language :: Python :: 3',
        'Topic :: Communications :: Email',
    ],
)
