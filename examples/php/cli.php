<?php
// The client from the command line: AMOAUTH_URL=… AMOAUTH_API_KEY=… php cli.php token 31337001
//   php cli.php token ACCOUNT | connections [EXTERNAL_ID] | connect-link EXTERNAL_ID RETURN_URL
//             | amocrm ACCOUNT METHOD PATH [JSON_BODY]

declare(strict_types=1);

require __DIR__ . '/Amoauth.php';

use App\Services\Amoauth;
use App\Services\AmoauthException;

$amoauth = new Amoauth(getenv('AMOAUTH_URL') ?: 'http://127.0.0.1:8080', getenv('AMOAUTH_API_KEY') ?: '');
try {
    $answer = match ($argv[1] ?? '') {
        'token' => $amoauth->token($argv[2]),
        'connections' => $amoauth->connections($argv[2] ?? null),
        'connect-link' => $amoauth->connectLink($argv[2], $argv[3]),
        'amocrm' => $amoauth->amocrm($argv[2], $argv[3], $argv[4], [], isset($argv[5]) ? json_decode($argv[5], true, 512, JSON_THROW_ON_ERROR) : null),
        default => throw new InvalidArgumentException('usage: cli.php token ACCOUNT | connections [EXTERNAL_ID] | connect-link EXTERNAL_ID RETURN_URL | amocrm ACCOUNT METHOD PATH [JSON_BODY]'),
    };
    echo json_encode($answer, JSON_UNESCAPED_SLASHES), "\n";
} catch (AmoauthException $e) {
    fwrite(STDERR, $e->getMessage() . "\n");
    exit(1);
}
